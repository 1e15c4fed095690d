"""Online serving loop: a meta-learned policy meets a stream of new users.

For every user of the stream (in order) the served policy starts from the meta-learned parameters
and plays ``rounds`` rounds. In a round it observes the user's state, recommends (one episode of up
to ``horizon`` steps: observe -> recommend -> click / no click -> next), and then updates its
parameters for this user with one inner step of the meta-learner (its meta-learned learning rates)
on the round's feedback. Reported: the running CTR over the stream (cumulative clicks / cumulative
recommendations after each round) and the CTR per round index averaged over users, which shows how
fast the policy adapts to a newcomer. Everything runs in one ``lax.scan`` (users) of ``lax.scan``
(rounds); the meta-parameters themselves are not changed by the stream.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metarec.rl import env as envlib
from metarec.rl import networks
from metarec.rl.maml import MetaRL
from metarec.rl.rollout import episode_metrics, rollout


def run_online(
    key,
    network: networks.Network,
    learner: MetaRL,
    meta_params,
    stream: envlib.EnvParams,
    rounds: int,
    adapt: bool = True,
) -> dict:
    """Serve the users of batched ``stream`` one after another.

    Returns ``running_ctr [U * rounds]``, ``round_ctr [rounds]`` (mean over users), ``clicks`` and
    ``steps`` ``[U, rounds]``. ``adapt=False`` serves the meta-initialisation unchanged (control).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")

    def user(_, xs):
        k, ep = xs

        def round_(state, kk):
            k_ep, _ = jax.random.split(kk)
            act = networks.sample_actor(network.apply, state["params"], ep.slate_size)
            traj, _ = rollout(k_ep, ep, act)
            m = episode_metrics(traj)
            if adapt:
                batch = jax.tree_util.tree_map(lambda x: x[None], traj)
                state = {**state, "params": learner.inner_step(state, state["params"], batch)}
            return state, (m["clicks"], m["steps"])

        _, (clicks, steps) = jax.lax.scan(round_, meta_params, jax.random.split(k, rounds))
        return None, (clicks, steps)

    n = envlib.num_users(stream)
    _, (clicks, steps) = jax.lax.scan(user, None, (jax.random.split(key, n), stream))
    running = jnp.cumsum(clicks.reshape(-1)) / jnp.maximum(jnp.cumsum(steps.reshape(-1)), 1.0)
    round_ctr = jnp.sum(clicks, 0) / jnp.maximum(jnp.sum(steps, 0), 1.0)
    return {"running_ctr": running, "round_ctr": round_ctr, "clicks": clicks, "steps": steps}
