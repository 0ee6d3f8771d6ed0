"""SAM models (official ViT-H/L/B, MobileSAM's TinyViT, the embedded tiny model) with official state-dict keys."""
from trimask.models.build import MODEL_TYPES, build_sam, model_identity
from trimask.models.sam import Sam

__all__ = ["MODEL_TYPES", "Sam", "build_sam", "model_identity"]
