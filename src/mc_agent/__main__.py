import sys

from mc_agent import config, server

USAGE = "usage: python3 -m mc_agent (apply-config | serve)"

if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "apply-config":
        config.main()
    elif command == "serve":
        server.serve()
    else:
        sys.exit(USAGE)
