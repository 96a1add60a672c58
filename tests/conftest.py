"""Shared test settings: the tiny models gain nothing from a second thread, and on a 2-core
machine shared with other processes one thread per test is faster and steadier."""

import torch

torch.set_num_threads(1)
