"""One trial: data, teachers, distillation losses, compression and measurement."""
