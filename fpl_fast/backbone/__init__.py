"""The frozen CLIP backbone: the model, its text tower as a function, loading and checkpoint formats, the
interface (``protocol``). Import the submodules: this package stays cheap to import."""
