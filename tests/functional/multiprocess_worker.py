"""One of the processes of tests/functional/test_scaling.py::test_two_processes_sync_batch_norm.

Usage: ``python multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT INPUTS.npz OUT.npz``, with
``XLA_FLAGS=--xla_force_host_platform_device_count=K`` in the environment. Joins a
``jax.distributed`` cluster on 127.0.0.1 (gloo CPU collectives), builds the global batch from
INPUTS over the devices of *all* processes, runs jaxbn sync batch norm (shard_map with
``axis_name`` and a row mask; and plain jit on a batch-sharded array without ``axis_name``) with
gradients, gathers the results and writes them to OUT. The parent compares them with torch.
"""

from __future__ import annotations

import sys

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(process_id: int, num_processes: int, port: int, inputs: str, out: str) -> None:
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
    )
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxbn

    data = dict(np.load(inputs))
    mesh = jax.make_mesh((jax.device_count(),), ("d",))
    rows = NamedSharding(mesh, P("d"))
    glob = lambda a: jax.make_array_from_callback(a.shape, rows, lambda index: a[index])  # noqa: E731
    x, mask, cot = glob(data["x"]), glob(data["mask"]), glob(data["cot"])
    state = jaxbn.BatchNormState(
        jnp.asarray(data["running_mean"]), jnp.asarray(data["running_var"]),
        jnp.asarray(data["num_batches_tracked"]))
    params = jaxbn.BatchNormParams(jnp.asarray(data["weight"]), jnp.asarray(data["bias"]))
    flags = jaxbn.BatchNormFlags(momentum=float(data["momentum"]))

    def synced(x, mask, state, params):
        return jax.shard_map(
            lambda x, m, s, p: jaxbn.batch_norm(x, s, p, flags.replace(axis_name="d"), mask=m),
            mesh=mesh, in_specs=(P("d"), P("d"), P(), P()), out_specs=(P("d"), P()),
        )(x, mask, state, params)

    def partitioned(x, mask, state, params):  # no axis_name: XLA inserts the collectives
        return jaxbn.batch_norm(x, state, params, flags, mask=mask)

    results = {
        "process_count": np.asarray(jax.process_count()),
        "device_count": np.asarray(jax.device_count()),
        "local_device_count": np.asarray(jax.local_device_count()),
    }
    for name, forward in [("shard_map", synced), ("jit", partitioned)]:
        def loss(x, params, mask, cot):  # global arrays must be arguments, not closed over
            y, new_state = forward(x, mask, state, params)
            return jnp.sum(y * cot), (y, new_state)

        (_, (y, new_state)), (dx, dp) = jax.jit(
            jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, params, mask, cot)
        y, dx = multihost_utils.process_allgather((y, dx), tiled=True)
        for key, value in [("y", y), ("dx", dx), ("dweight", dp.weight), ("dbias", dp.bias),
                           *zip(new_state._fields, new_state)]:
            results[f"{name}/{key}"] = np.asarray(value)
    np.savez(out, **results)
    jax.distributed.shutdown()


if __name__ == "__main__":
    pid, nproc, port, inputs, out = sys.argv[1:6]
    main(int(pid), int(nproc), int(port), inputs, out)
