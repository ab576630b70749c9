"""Optional research pieces built on the engine core: loss weightings, Selective Task Group
Updates and its clustering."""
