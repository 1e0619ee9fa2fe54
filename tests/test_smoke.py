def test_zoo_builds_and_cli_runs(zoo, cli):
    fam = zoo.get("llama")
    r = cli("inspect", fam.base, "--json")
    assert r.exit_code == 0, r.stderr
    assert r.json()["parameters"] > 0
