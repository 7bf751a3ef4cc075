"""Reinforcement learning on the chat model: tasks and rewards (`rewards`), preference pairs
(`pairs`), GRPO (`grpo`) and DPO (`dpo`) as objectives of the one training loop, and the
`rl` stage (`stage`)."""
