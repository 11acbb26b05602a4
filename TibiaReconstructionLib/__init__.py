"""TibiaReconstructionLib: predict a healthy tibia from a CT of the fractured tibia.

Headless library behind the `tibia-recon` command and the TibiaReconstruction Slicer module
(Zhou et al., "Masked Registration and Autoencoding of CT Images for Predictive Tibia
Reconstruction", arXiv 2512.09525). All physical coordinates are LPS millimetres.
"""

__version__ = "0.1.0"
