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
# How often a thread holding the GIL hands it over (Python's default: every 5 ms). A prediction runs threads beside
# each other (torch loading while the CT is read and cropped, the surface built while the result goes onto the CT
# grid), each waiting for the GIL between its numpy and SimpleITK calls; handed over every 0.5 ms, a 512x512x400 CT's
# `tibia-recon predict` took a median 5.78 s instead of 6.05 s (8 interleaved runs each on 2 cores).
PROCESS_SWITCH_INTERVAL_S = 0.0005
