"""CBNet's converting autoencoder (eejax/models/cbnet.py): pipeline, conversion targets, cost."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eejax.models import cbnet
from eejax.models import perceiver as P


def test_pipeline_is_classifier_of_autoencoder():
    acfg = cbnet.AutoencoderConfig(hidden=(16, 4))
    a_gd, a_p = cbnet.build(acfg, 0)
    c_gd, c_p = P.build(P.PerceiverConfig(width=8, depth=1, latent_tokens=0), 0)
    ae, clf = nnx.merge(a_gd, a_p), nnx.merge(c_gd, c_p)
    x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
    converted = ae(x)
    assert converted.shape == x.shape
    np.testing.assert_allclose(cbnet.pipeline(ae, lambda z: clf.static(z, 0), x), clf.static(converted, 0),
                               rtol=1e-6, atol=1e-6)
    assert acfg.dims == (784, 16, 4, 16, 784)
    assert cbnet.autoencoder_flops(acfg) == 2 * (784 * 16 + 16 * 4 + 4 * 16 + 16 * 784)
    with pytest.raises(ValueError, match="autoencoder expects"):
        ae(jnp.zeros((2, 32, 32, 3)))


def test_conversion_targets_pick_most_confident_image_of_each_class():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 4).astype(np.int32)
    probs = rng.dirichlet(np.ones(3), size=12)
    images = np.arange(12).reshape(12, 1, 1, 1)
    t = cbnet.conversion_targets(probs, labels, images)
    for k in range(3):
        members = np.flatnonzero(labels == k)
        assert t.index_K[k] == members[np.argmax(probs[members, k])]
        assert labels[t.index_K[k]] == k and t.images_KxHxWxC[k, 0, 0, 0] == t.index_K[k]
    with pytest.raises(ValueError, match="class 2 has no example"):
        cbnet.conversion_targets(probs[:8], labels[:8], images[:8])


def test_conversion_loss_reads_the_target_of_each_label():
    targets = jnp.stack([jnp.zeros((2, 2, 1)), jnp.ones((2, 2, 1))])
    x = jnp.ones((2, 2, 2, 1))
    assert float(cbnet.conversion_loss(x, targets, jnp.array([1, 1]))) == 0.0
    assert float(cbnet.conversion_loss(x, targets, jnp.array([0, 1]))) == pytest.approx(0.5)
