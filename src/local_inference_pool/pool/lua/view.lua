return fleet(ahead(tonumber(ARGV[3]), tonumber(ARGV[4]), free()))
