"""MongoDB: logical dumps of raw BSON, change-stream slices, and restores that replay them."""
