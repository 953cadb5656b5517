from minigpt_cli.cli.app import main

main()
