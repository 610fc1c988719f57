"""The GPU acceptance command (`gpu.py`) and the workers it starts (`workers.py`): a test harness run on a GPU."""
