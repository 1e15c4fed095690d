"""Print a MovieLens dataset's cleaning counts and its cold-start scenario table.

  python -m experiments.describe_data --dataset=ml-100k --seed=0 [--protocol=melu|time] [--data_dir=...]
"""

from absl import app, flags, logging

from metarec import data as mdata

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "ml-100k", ["ml-100k", "ml-1m"], "MovieLens variant.")
flags.DEFINE_string("data_dir", None, "Folder with GroupLens or RecBole files (default: cache / recbole wheel).")
flags.DEFINE_bool("download", False, "Download from GroupLens if not cached.")
flags.DEFINE_integer("seed", 0, "Scenario seed.")
flags.DEFINE_enum("protocol", "melu", ["melu", "time"], "Cold-start protocol (PROTOCOL.md).")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    data = mdata.load_dataset(FLAGS.dataset, data_dir=FLAGS.data_dir, download=FLAGS.download)
    print(f"dataset {data.name} ({data.format}) from {data.source}")
    print(f"users {len(data.users)}, items {len(data.items)}, ratings {len(data.ratings)}, genres {len(data.genres)}")
    print("cleaning counts:")
    for k, v in data.report.items():
        print(f"  {k:28s} {v}")
    split = mdata.make_split(data, FLAGS.seed, FLAGS.protocol)
    print(f"\nprotocol {FLAGS.protocol}, seed {FLAGS.seed}: {len(split.new_users)} new users, "
          f"{len(split.new_items)} new items, {len(split.train_ratings)} training ratings")
    print(split.table().to_string(index=False, float_format=lambda v: f"{v:.1f}"))


if __name__ == "__main__":
    app.run(main)
