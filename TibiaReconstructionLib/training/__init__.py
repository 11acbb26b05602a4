"""Training of the three steps (registration, autoencoders, mask robustness) on canonical data sets.

Entry points: :func:`~.step1_registration.train_step1`, :func:`~.step2_autoencoders.train_step2`,
:func:`~.step3_mask_robust.train_step3` (each takes a configuration from :func:`~.config.load_config`)
and :func:`~.export.export_bundle`.
"""
