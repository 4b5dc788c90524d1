"""WebAssembly in wasmtime: compiled modules and their cache (`modules`), one
sandboxed run of a module (`sandbox`), the threads that run them (`pool`)."""
