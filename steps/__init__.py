"""The pipeline's stages, one module each (see dvc.yaml); shared code lives in `steps.core`."""
