import torch

# The test models are tiny (widths ~32-128): intra-op threads only add synchronisation cost, which
# made generation up to 10x slower on a busy 2-core machine. One thread keeps the suite fast everywhere.
torch.set_num_threads(1)
