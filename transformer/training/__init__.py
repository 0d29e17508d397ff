"""What a training run needs around the optimizer step: the loss, the schedule, the budget, the ranks, the run folder.

`transformer.train` is the loop that puts them together.
"""
