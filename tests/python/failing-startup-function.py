"""A startup function that fails: the server must refuse to start."""


async def hypha_startup(server):
    """Raises after connecting, as a broken startup function would."""
    raise RuntimeError("this startup function refuses to start")
