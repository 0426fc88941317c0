"""Operations on a built collection: cluster, export, remove, snapshots, aliases."""
