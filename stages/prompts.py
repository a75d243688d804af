"""Texts shared by the generator and the first-frame editors (no code: a change here is a text change)."""

# The reference's default negative prompt (I2VGen-XL's example prompt), shared with the first-frame editors.
DEFAULT_NEGATIVE_PROMPT = (
    "Distorted, discontinuous, Ugly, blurry, low resolution, motionless, static, disfigured, "
    "disconnected limbs, Ugly faces, incomplete arms"
)
