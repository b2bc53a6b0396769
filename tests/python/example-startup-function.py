"""Example startup function file for Hypha (the getting-started guide's, with upstream's
test body `x + 99`): run with `hypha-server --startup-functions
./example-startup-function.py:hypha_startup`."""


async def hypha_startup(server):
    """Hypha startup function."""

    # The server object passed into this function is identical to the one in the client script.
    # You can register more functions or call other functions using this server object.
    await server.register_service(
        {
            "id": "test-service",
            "config": {
                "visibility": "public",
                "require_context": False,
            },
            "test": lambda x: x + 99,
        }
    )
