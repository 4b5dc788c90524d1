;; trap: fails at once (an `unreachable` instruction). For tests.
(module
  (memory (export "memory") 1)
  (func (export "_start")
    unreachable))
