from pathlib import Path
from TibiaReconstructionLib.bench import write_speed_inputs, SIZE_LIMIT_MM
from TibiaReconstructionLib.phantoms import generate_case
base = generate_case(500000, fractured=True, side="left", spacing=(1.0,1.0,2.0), fracture_type="oblique", size_limit_mm=SIZE_LIMIT_MM, both_legs=True)
print(write_speed_inputs(base, (512,512,400), Path("/tmp/exp/s12/both")))
