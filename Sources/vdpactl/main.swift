print("vdpactl: not built yet")
