from dagster import DynamicPartitionsDefinition

# One partition per source file, keyed by the file's name (see paths.check_partition_key).
source_files = DynamicPartitionsDefinition(name="source_files")
