"""Frontends turn models into per-layer features (and Grams) for the core.

A frontend is anything that turns a batch into an ordered mapping ``layer name -> array``; see
:class:`cka.frontends.base.FeatureExtractor`. Each framework's frontend is reached by its import path
(``cka.frontends.torch``, ``cka.frontends.onnx``, ``cka.frontends.jax``) so that importing ``cka``
imports no framework.
"""
