"""Optional research pieces built on the engine core (they import the core, never the reverse):
loss weightings (`weighting`), task-conditioned models (`conditioning`) and Selective Task Group
Updates (`stgu`)."""
