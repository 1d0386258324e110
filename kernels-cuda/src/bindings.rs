// generated placeholder
