"""mmjax.sharding: meshes over (abstract) devices, multislice DCN shapes."""
import ml_collections
import pytest

from mmjax import sharding, topologies


def test_multislice_mesh_puts_data_parallelism_across_slices():
  """Two v4-8 slices: the default dcn_shape (-1, 1, 1) splits `data` over the slices, so
  every fsdp group (the all-gathers) stays inside one slice."""
  devices = topologies.parse("v4-8", num_slices=2).devices()
  config = ml_collections.ConfigDict(dict(mesh=dict(shape=(-1, 4, 1), dcn_shape=(-1, 1, 1))))
  mesh = sharding.make_mesh(config, devices)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  for row in mesh.devices[:, :, 0]:
    assert len({d.slice_index for d in row}) == 1
  assert {d.slice_index for d in mesh.devices[:, 0, 0]} == {0, 1}


@pytest.mark.parametrize("dcn, shape, slices, message", [
    ((2, 1, 1), (1, 8, 1), 2, "not divisible"),
    ((1, 1, 1), (2, 4, 1), 2, "spans 1 slices"),
    ((-1, -1, 1), (2, 4, 1), 2, "at most one -1"),
])
def test_dcn_shape_errors_name_the_key(dcn, shape, slices, message):
  with pytest.raises(ValueError, match=message) as e:
    sharding.resolve_dcn_shape(dcn, shape, slices)
  assert "mesh.dcn_shape" in str(e.value)


def test_single_slice_resolves_dcn_to_ones():
  assert sharding.resolve_dcn_shape((-1, 1, 1), (4, 16, 1), 1) == (1, 1, 1)
