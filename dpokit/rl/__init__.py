"""RLHF's RL stage (`dpokit rl`): PPO and RLOO against a reward, beside DPO for comparison.

`losses` holds the arithmetic (pure torch), `rollout` the sampling and per-token forwards, `loop` the
run (read it top to bottom), `toy` a toy reward for smoke runs.
"""
