"""Training: the synthetic world and captioned datasets (`data`), the tiny teacher (`teacher`), latent consistency
distillation (`distill`), the shared accelerate loop (`loop`, `runlog`), the whole tiny recipe (`recipe`) and its
evaluation (`eval`).

Submodules are imported explicitly (`from lcmkit.train.distill import distill`), so `import lcmkit` stays light.
"""
