"""The frozen CLIP backbone, one job per module: ``model`` (FrozenCLIP), ``text_tower`` (its text tower as a
function, with the shared-prefix path), ``loading`` (``load_backbone``), ``checkpoints`` (file formats), ``configs``
(the shipped configs), ``feature_cache`` (image features), ``protocol`` (the interface). Import the submodules:
this package stays cheap to import."""
