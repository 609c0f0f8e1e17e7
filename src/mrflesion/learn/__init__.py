"""Learning core: U-net (:mod:`.networks`), variants (:mod:`.spec`), losses (:mod:`.losses`), training
data (:mod:`.data`), subject split (:mod:`.split`), resumable training (:mod:`.train`), checkpoints
(:mod:`.checkpoint`) and inference (:mod:`.infer`).

Import from the submodules. This package imports nothing itself, so that the torch-free parts
(:mod:`.spec`, :mod:`.split`) can be used while the workflow is planned without importing torch.
"""
