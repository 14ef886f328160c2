"""One training run: the checks before it starts, its frozen plan, the loop and its callbacks, evaluation,
certification, checkpoints and their publishing, tracking, and what it leaves behind."""
