# Sourced by the scripts: Open MPI (pip wheel) as root, more ranks than cores, no binding.
# Harmless for MPICH or a cluster MPI; a cluster job script sets its own.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export PRTE_MCA_rmaps_default_mapping_policy=${PRTE_MCA_rmaps_default_mapping_policy:-:oversubscribe}
export PRTE_MCA_hwloc_default_binding_policy=${PRTE_MCA_hwloc_default_binding_policy:-none}
export OMPI_MCA_rmaps_base_oversubscribe=${OMPI_MCA_rmaps_base_oversubscribe:-1}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
