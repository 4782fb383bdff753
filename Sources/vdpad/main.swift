print("vdpad: not built yet")
