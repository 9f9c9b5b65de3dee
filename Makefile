# eventjournal developer commands. `make help` lists them.
.DEFAULT_GOAL := help
.PHONY: help run test lint fmt ci mongod-start mongod-stop failover-set clean-local

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

run: ## Start MongoDB (installing it if missing) and the service on 127.0.0.1:50051
	cargo xtask run

test: ## Run the whole test suite against a fresh mongod (installing it if missing)
	cargo xtask test

lint: ## cargo fmt --check and clippy with warnings as errors
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

fmt: ## Format the code
	cargo fmt --all

ci: lint test ## What .ci/run runs

mongod-start: ## Start the dev mongod alone and print its connection string
	cargo xtask mongod-start --instance dev

mongod-stop: ## Stop the dev mongod (its data stays in .local/dev)
	cargo xtask mongod-stop --instance dev

failover-set: ## Start a fresh three-member replica set with quick elections (.local/failover) and print its URI
	cargo xtask mongod-start --instance failover --members 3

clean-local: ## Stop the mongods and delete .local (mongod install and all dev data)
	cargo xtask mongod-stop --instance dev
	cargo xtask mongod-stop --instance test
	cargo xtask mongod-stop --instance failover
	rm -rf .local
