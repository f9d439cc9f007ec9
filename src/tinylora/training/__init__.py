"""Training: rollout → reward → advantage → loss → v (trainer), with the GRPO math, log-probs and checkpoints."""
