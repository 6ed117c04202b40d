"""Experiments for mabn_jax: data, ResNets, the training loop and reproductions.

Not part of the library: ``mabn_jax`` never imports this package. Needs the
``experiments`` extra (scikit-learn, orbax-checkpoint, Pillow, matplotlib,
tqdm; tensorflow-datasets optional).
"""
