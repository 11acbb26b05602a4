"""TibiaReconstructionLib: predict a healthy tibia from a CT of the fractured tibia.

Headless library behind the `tibia-recon` command and the TibiaReconstruction Slicer module
(Zhou et al., "Masked Registration and Autoencoding of CT Images for Predictive Tibia
Reconstruction", arXiv 2512.09525). All physical coordinates are LPS millimetres.
"""

__version__ = "0.1.0"

# The environment a process that predicts should start with (set before numpy and torch load; a user's own settings
# win): OpenMP threads that sleep instead of spinning while they wait (busy-waiting makes torch 3-8x slower on a
# loaded machine), and no huge pages for numpy's large arrays (the kernel compacts memory when a CT-sized array is
# first written: up to 0.5 s per array where memory is fragmented, against 0.1 s with normal pages). The command
# sets it for itself; the Slicer module for its worker process.
PROCESS_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE", "NUMPY_MADVISE_HUGEPAGE": "0"}
