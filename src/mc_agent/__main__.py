import sys

from mc_agent import browser, config, server

USAGE = "usage: python3 -m mc_agent (apply-config | serve | browser URL)"

if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "apply-config":
        config.main()
    elif command == "serve":
        server.serve()
    elif command == "browser":
        sys.exit(browser.browser_command(sys.argv[2:]))
    else:
        sys.exit(USAGE)
