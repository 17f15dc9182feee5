from explainctl.cli.commands import main

main()
