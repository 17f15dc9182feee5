from explainctl.cli import main

main()
