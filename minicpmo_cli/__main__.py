from minicpmo_cli.cli.app import main

main()
