"""Code that several stages share. Heavy libraries (torch, transformers, mlflow) are imported
lazily inside functions so that `import steps.core` stays fast and CPU-only machines never
import CUDA code they do not use."""
