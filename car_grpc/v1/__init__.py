"""Generated from proto/car/v1 by scripts/gen_protos.py. Do not edit."""
