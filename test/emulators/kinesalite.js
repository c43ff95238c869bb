// Starts kinesalite (the emulator the original Convoy recommended) bound to
// 127.0.0.1 only, on the port given, for the compatibility run of the suite.
// Its CLI listens on every interface, so it is started through its API.
const kinesalite = require("kinesalite");
const port = Number(process.argv[2] || 4567);
const server = kinesalite({ createStreamMs: 0, deleteStreamMs: 0, updateStreamMs: 0, shardLimit: 1000 });
server.listen(port, "127.0.0.1", () => console.log(`kinesalite listening on http://127.0.0.1:${port}`));
