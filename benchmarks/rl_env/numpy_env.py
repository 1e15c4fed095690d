"""The user simulator of :mod:`metarec.rl.env`, written as a plain per-user numpy loop: the
reference the vmapped JAX simulator is benchmarked against. Same dynamics, same numbers: the click
and leave draws are passed in (``u_click``, ``u_leave``), so a test can feed it the uniforms JAX
draws and compare states step by step."""

from __future__ import annotations

import numpy as np

#: the per-user fields of :class:`~metarec.rl.env.EnvParams` a :class:`NumpyUser` reads
ENV_FIELDS = (
    "affinity",
    "click_reward",
    "item_genres",
    "item_mask",
    "threshold",
    "temperature",
    "boredom_weight",
    "boredom_decay",
    "leave_base",
    "leave_growth",
    "repeat_penalty",
    "invalid_penalty",
)


def users_of(env_params) -> list:
    """One :class:`NumpyUser` per user of batched (host or device) ``EnvParams``."""
    fields = {f: np.asarray(getattr(env_params, f)) for f in ENV_FIELDS}
    n = fields["affinity"].shape[0]
    return [
        NumpyUser({k: v[u] for k, v in fields.items()} | {"horizon": env_params.horizon})
        for u in range(n)
    ]


class NumpyUser:
    """One user's environment (host arrays of one user's :class:`~metarec.rl.env.EnvParams`)."""

    def __init__(self, params: dict):
        self.p = {k: np.asarray(v) for k, v in params.items()}
        self.n_items = self.p["affinity"].shape[0]
        self.reset()

    def reset(self) -> None:
        p = self.p
        self.t = 0
        self.consumed = np.zeros(self.n_items, np.float32)
        self.fatigue = np.zeros(p["item_genres"].shape[1], np.float32)
        self.unrewarded = 0
        self.done = False

    def action_mask(self) -> np.ndarray:
        return self.p["item_mask"] * (1.0 - self.consumed)

    def step(self, action: int, u_click: float, u_leave: float) -> tuple[float, bool]:
        """One step (a no-op once done); returns ``(reward, done)``."""
        p = self.p
        if self.done:
            return 0.0, True
        a = min(max(int(action), 0), self.n_items - 1)
        valid = 0 <= action < self.n_items and p["item_mask"][a] > 0
        repeat = valid and self.consumed[a] > 0
        # every item's click probability, as the JAX step computes it (the oracle's expected
        # reward, for regret, needs them all)
        logits = (p["affinity"] - p["threshold"]) / p["temperature"]
        logits = logits - p["boredom_weight"] * (p["item_genres"] @ self.fatigue)
        probs = 1.0 / (1.0 + np.exp(-logits))
        er = np.where(self.consumed > 0, -p["repeat_penalty"], probs * p["click_reward"])
        self.best_expected_reward = float(
            np.max(np.where(p["item_mask"] > 0, er, -p["invalid_penalty"]))
        )
        prob = float(probs[a]) if valid and not repeat else 0.0
        click = u_click < prob
        reward = float(click) * float(p["click_reward"][a])
        if not valid:
            reward -= float(p["invalid_penalty"])
        elif repeat:
            reward -= float(p["repeat_penalty"])
        if valid:
            self.fatigue = p["boredom_decay"] * self.fatigue + p["item_genres"][a]
            self.consumed[a] = 1.0
        self.unrewarded = 0 if click else self.unrewarded + 1
        self.t += 1
        leave = min(max(p["leave_base"] + p["leave_growth"] * self.unrewarded, 0.0), 1.0)
        terminated = u_leave < leave
        truncated = self.t >= p["horizon"] and not terminated
        self.done = bool(terminated or truncated)
        return reward, self.done


def run_random_episodes(users: list[NumpyUser], seed: int) -> int:
    """One episode per user with a uniformly random valid action; returns the steps taken."""
    rng = np.random.default_rng(seed)
    steps = 0
    for user in users:
        user.reset()
        done = False
        while not done:
            valid = np.flatnonzero(user.action_mask() > 0)
            _, done = user.step(int(rng.choice(valid)), rng.random(), rng.random())
            steps += 1
    return steps
