"""The party process: gRPC server, admin commands, health."""
