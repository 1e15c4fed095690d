"""Meta-RL recommendation: meta-learned policies vs bandits and PPO on held-out simulated users."""
